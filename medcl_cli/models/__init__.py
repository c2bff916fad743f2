"""The segmentation network and its heads."""
