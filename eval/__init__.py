"""Evaluation of text-to-image generations: FID/KID (clean-fid "clean" mode), FD in DINOv2 (timm) or CLIP
features, precision/recall/density/coverage, CLIP score, CMMD, shapes alignment (a GenEval in miniature),
COCO-30k helpers and the benchmark runner.

Modules (imported on demand; none imports training code): ``features`` (feature spaces: a network with its
preprocessing, extraction), ``inception`` weights resolution and features, ``dinov2`` (timm networks),
``fid`` (statistics, Frechet distance, KID), ``prdc``, ``clip``, ``cmmd``, ``align``, ``coco``, ``bench``,
``images`` (shared image I/O), ``cli`` (``tmot eval ...``).
"""
