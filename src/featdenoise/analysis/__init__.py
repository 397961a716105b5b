"""Experiments that compose training and evaluation: the Fashion-MNIST demo (:mod:`.demo`) and the
paper's ablations (:mod:`.ablate`, Fig. 7 and Table 1)."""
