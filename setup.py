"Packaging: every piece of metadata and every requirement comes from settings.ini."
from configparser import ConfigParser
from pathlib import Path

import setuptools

here = Path(__file__).parent
config = ConfigParser(delimiters=["="])
config.read(here / "settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

licenses = {"apache2": ("Apache Software License 2.0", "OSI Approved :: Apache Software License")}
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable", "6 - Mature", "7 - Inactive"]
py_versions = "3.10 3.11 3.12 3.13".split()
lic = licenses[cfg["license"]]
min_python = cfg["min_python"]
requirements = cfg.get("requirements", "").split()
dev_requirements = cfg.get("dev_requirements", "").split()
# Optional features: `<name>_requirements = ...` in settings.ini is the extra `<name>` ("_" written "-").
extras = {key[:-len("_requirements")].replace("_", "-"): value.split() for key, value in cfg.items()
          if key.endswith("_requirements") and key not in ("requirements", "dev_requirements")}
# `dev`: the test tools and every optional feature, so that the test suite exercises them all; not the DICOM
# decoder plugins, whose absence the tests check is reported with what to install, nor the 45 MB of lite1/lite2
# weights, which no test needs.
NOT_IN_DEV = {"dicom-codecs", "lite-weights"}
dev_requirements += sorted({r for name, reqs in extras.items() if name not in NOT_IN_DEV for r in reqs} - set(dev_requirements))
readme = here / "README.md"

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=readme.read_text(encoding="utf-8") if readme.exists() else cfg["description"],
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    url=cfg["git_url"],
    license=lic[0],
    keywords=cfg["keywords"],
    classifiers=[
        "Development Status :: " + statuses[int(cfg["status"])],
        "Intended Audience :: " + cfg["audience"].title(),
        "Natural Language :: " + cfg["language"].title(),
        "License :: " + lic[1],
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ] + ["Programming Language :: Python :: " + v for v in py_versions[py_versions.index(min_python):]],
    packages=setuptools.find_packages(include=[cfg["lib_path"], cfg["lib_path"] + ".*"]),
    include_package_data=True,
    install_requires=requirements,
    extras_require={"dev": dev_requirements, **extras},
    python_requires=">=" + min_python,
    zip_safe=False,
    entry_points={"console_scripts": cfg.get("console_scripts", "").split()},
)
