"""fracture_fastai: rapid deep-learning experiments on bone radiographs, built on fastai."""
__version__ = "0.1.0"

import warnings as _warnings

# fastai's import touches torch.jit.script, which torch 2.14 deprecates with a FutureWarning on every start;
# it says nothing to a user of this package and would break our one-line error reports.
_warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)


def load_model(path):
    "A trained model from a run folder or its model.json, without unpickling anything (see `model_io.load_model`)."
    from .model_io import load_model as _load
    return _load(path)
