"""Overlay pictures of predictor outputs; defined in ``ddl_mask2former_serve.overlay`` (numpy and
OpenCV only), which the demo, the folder scan's report and the web page all draw with."""
from ddl_mask2former_serve.overlay import forged_area_fraction, format_caption, render_forgery_overlay

__all__ = ["forged_area_fraction", "format_caption", "render_forgery_overlay"]
