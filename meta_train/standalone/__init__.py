"""Standalone weight-space tasks: metanetworks that read trained networks' weights (classify an
INR's image, regress a sine INR's frequency, predict a classifier's test accuracy), each trained
side by side with the peers (nfn's NPLinear model, a flat MLP, StatNN) on the same data and
budget. Run with ``python -m meta_train.standalone TASK --data DIR --out DIR``; see ``harness.py``.
"""
