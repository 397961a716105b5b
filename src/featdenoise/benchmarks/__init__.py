"""The ``featdenoise bench`` targets, one module each (:mod:`.ops`, :mod:`.attacks` with
:mod:`.autoattack`, :mod:`.train`, :mod:`.recipes`, :mod:`.agreement`, :mod:`.gpu`), each with
``run(args) -> int``, the one place where it prints its results; the clocks and the set-up they
share are in :mod:`.common`."""
