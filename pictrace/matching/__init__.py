"""Pairwise judgement: how one query compares with one gallery image, as pure functions of their features.

``geometry`` (ORB + RANSAC fit and the cheap screen), ``scores`` (component scores and their fusion),
``mirror`` (the fit against the mirrored query), ``transform`` (what was done to a copy, read off its fit) and
``verdict`` (exact / copy / similar). Which candidates get which check, and on which thread, is the search's
business (pictrace/search/).
"""
