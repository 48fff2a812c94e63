"""Install DDL-Mask2Former: ``pip install --no-build-isolation -e .``

The importable package lives in ``projects/DDLMask2Former/ddl_mask2former`` (detectron2
project layout). The multi-scale deformable attention CUDA op is built here as
``ddl_mask2former.ops._C`` when a CUDA toolchain and a CUDA build of torch are present.
"""
from setuptools import find_packages, setup

PROJECT_DIR = "projects/DDLMask2Former"

setup(
    name="ddl-mask2former",
    version="0.1.0",
    description="Joint deepfake detection and localization with a Mask2Former-style model",
    python_requires=">=3.10",
    package_dir={"": PROJECT_DIR},
    packages=find_packages(PROJECT_DIR),
    package_data={"ddl_mask2former.ops": ["csrc/*.h", "csrc/*.cpp", "csrc/*.cu"]},
)
