"""Evaluation metrics: FID, FD_DINOv2, precision/recall and KID, with reference statistics.

    from fastdiff import metrics
    ref = metrics.make_reference("dataset.zip", "ref.npz", num=None)         # statistics of a dataset
    metrics.calc_from_images("samples/", "ref.npz")                           # {"fid": ...}
    metrics.calc_from_generator(batches, "ref.npz", metrics="fid,pr,kid")     # straight from a sampler

or ``fastdiff metrics ref|calc|gen`` on the command line. Detector weights are read from local files only.
"""

from fastdiff.metrics.detectors import (DINOv2Detector, Detector, InceptionV3Detector, ModuleDetector,
                                        available_detectors, fd_metric_name, get_detector, register_detector,
                                        unregister_detector)
from fastdiff.metrics import classifier  # noqa: F401  (registers the 'classifier' detector)
from fastdiff.metrics.evaluate import (DEFAULT_NUM, calc_from_generator, calc_from_images, compute_feature_stats,
                                       compute_metrics, make_reference)
from fastdiff.metrics.frechet import frechet_distance
from fastdiff.metrics.kid import kernel_inception_distance
from fastdiff.metrics.prdc import precision_recall
from fastdiff.metrics.stats import FeatureStats, ReferenceStats, load_reference, save_reference
from fastdiff.metrics.vit import DinoVisionTransformer, dinov2_vitl14

__all__ = [
    "Detector", "InceptionV3Detector", "DINOv2Detector", "ModuleDetector", "available_detectors", "get_detector",
    "register_detector", "unregister_detector", "fd_metric_name",
    "FeatureStats", "ReferenceStats", "save_reference", "load_reference",
    "frechet_distance", "precision_recall", "kernel_inception_distance",
    "DEFAULT_NUM", "compute_feature_stats", "compute_metrics", "calc_from_generator", "calc_from_images",
    "make_reference", "DinoVisionTransformer", "dinov2_vitl14",
]
