"""featdenoise.evaluation: every robustness number of the library (paper Sec. 6).

- :mod:`.evaluate`: the one entry, ``evaluate(model, dataset, out_dir, job, options)``;
  :mod:`.options`: :class:`~.options.RunOptions`, how an evaluation runs (images, device, shards);
- :mod:`.whitebox` (iteration sweeps, Sec. 6.1), :mod:`.blackbox` (transfer and folder attackers,
  Sec. 6.2) and :mod:`.autoattack` build the job's columns; :mod:`.predict` labels a folder;
- :mod:`.engine` runs columns over batches (targets, seeds, shards, resume) with
  :mod:`.identity` (``settings.json``) and :mod:`.records` (per-image records);
- :mod:`.metrics`, :mod:`.paired` (statistics), :mod:`.report` (tables, Fig. 6) and
  :mod:`.sanity` (can the number be trusted?).
"""
