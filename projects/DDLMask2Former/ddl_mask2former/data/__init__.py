"""DDL-I data: registration, dataset mapper, augmentations, image I/O, synthetic data.

Importing this package registers ddl_i_train, ddl_i_val and ddl_i_test under
$DETECTRON2_DATASETS/DDL-I (default ./datasets/DDL-I); nothing is read from disk until a
dataset is requested.
"""
from .augmentations import BaseScaleResize, PadToSize, PhotometricDistortion, base_scale_size
from .dataset_mapper import IGNORE_VALUE, DDLDatasetMapper
from .ddl_dataset import load_ddl_split, register_all_ddl_i, register_ddl_split
from .image_header import read_image_size
from .image_io import DDLDataError, read_forgery_mask, read_image

register_all_ddl_i()

__all__ = [
    "BaseScaleResize",
    "DDLDataError",
    "DDLDatasetMapper",
    "IGNORE_VALUE",
    "PadToSize",
    "PhotometricDistortion",
    "base_scale_size",
    "load_ddl_split",
    "read_forgery_mask",
    "read_image",
    "read_image_size",
    "register_ddl_split",
]
