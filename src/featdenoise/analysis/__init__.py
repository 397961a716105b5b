"""Experiments that compose training and evaluation: the feature-noise pictures and distances
(:mod:`.viz`, paper Sec. 3), the Fashion-MNIST demo (:mod:`.demo`, with its budget
:mod:`.demo_budget` and report :mod:`.demo_report`) and the paper's ablations (:mod:`.ablate`,
Fig. 7 and Table 1)."""
