"""Evaluation of text-to-image generations: FID/KID (clean-fid "clean" mode), CLIP score, CMMD,
shapes alignment (a GenEval in miniature), COCO-30k helpers and the benchmark runner.

Modules (imported on demand; none imports training code):
``inception`` weights resolution and features, ``fid``, ``clip``, ``cmmd``, ``align``, ``coco``,
``bench``, ``images`` (shared image I/O), ``cli`` (``tmot eval ...``).
"""
