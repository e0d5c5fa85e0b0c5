from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path("dscovid/__init__.py").read_text().split("\n\n")[-1], version)

# Console scripts: every stage is a command (DESIGN.md §1) and a function.
COMMANDS = {
    "dscovid_verify_dataset": "dscovid.cli.verify_dataset:main",
    "dscovid_make_synthetic": "dscovid.cli.make_synthetic:main",
    "dscovid_lung_mask": "dscovid.cli.lung_mask:main",
    "dscovid_plan_and_preprocess": "dscovid.cli.plan_and_preprocess:main",
    "dscovid_train": "dscovid.cli.train:main",
    "dscovid_predict": "dscovid.cli.predict:main",
    "dscovid_evaluate": "dscovid.cli.evaluate:main",
    "dscovid_cv_summary": "dscovid.cli.cv_summary:main",
    "dscovid_find_postprocessing": "dscovid.cli.find_postprocessing:main",
    "dscovid_analyze": "dscovid.cli.analyze:main",
    "dscovid_convert": "dscovid.cli.convert:main",
    "dscovid_demo": "dscovid.cli.demo:main",
}

setup(
    name="dscovid",
    version=version["__version__"],
    description="Joint 3D lesion segmentation and COVID-19 / CAP / non-pneumonia classification of chest CT "
    "(DeepSC-COVID as a self-configuring pipeline)",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The plan presets live in the top-level plans/ folder and install as the data package dscovid.presets.
    packages=find_packages(include=["dscovid", "dscovid.*", "dataset_conversion", "dataset_conversion.*"])
    + ["dscovid.presets"],
    package_dir={"dscovid.presets": "plans"},
    package_data={"dscovid.presets": ["*.json"]},
    install_requires=[
        # Any torch from 2.1 on; `make` installs the CPU build 2.13.0 first so pip never pulls a CUDA build here.
        "torch>=2.1",
        "numpy>=1.24",
        "SimpleITK>=2.2",
        "batchgenerators>=0.25",
        "scikit-image>=0.21",
        "scipy>=1.10",
        # Exact Euclidean distance transforms on every core (the lung margin on the paper's fine grid); tested with 3.1.
        "edt>=2.3",
        # Connected components of full-size masks in one pass (the lesion report, small-lesion removal); tested with 4.1.
        "connected-components-3d>=3.12",
        "pandas>=2.0",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        # DICOM-SEG and TID 1500 structured reports of DICOM input (brings pydicom); tested with 0.28.
        "highdicom>=0.28",
    ],
    extras_require={
        # Reference implementations the tests compare against (nibabel: a NIfTI reader we did not write), the linter.
        "test": ["pytest>=7", "scikit-learn>=1.3", "monai>=1.3", "medpy>=0.5", "surface-distance>=0.1", "ruff>=0.4",
                 "nibabel>=5"],
    },
    entry_points={"console_scripts": [f"{name}={target}" for name, target in COMMANDS.items()]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
        "Intended Audience :: Science/Research",
    ],
)
