"""fracture_fastai: rapid deep-learning experiments on bone radiographs, built on fastai."""
__version__ = "0.1.0"
