"""Persistence: the SQLite catalogue (system of record) with each image's features and thumbnail."""

from pictrace.store.catalogue import Catalogue, GalleryImage, ImageRecord, RerankFeatures, Source, StoredImage

__all__ = ["Catalogue", "GalleryImage", "ImageRecord", "RerankFeatures", "Source", "StoredImage"]
