"""Datasets, augmentation, CRF, metrics, artifact I/O and the training engine."""
