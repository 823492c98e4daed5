"""The split engine, one module per stage: ``trace`` (:mod:`timm_split.trace`) -> :mod:`.analyse` (with the
union-find of :mod:`.atoms` and the op table of :mod:`.rules`) -> :mod:`.plan` (widths from :mod:`.search`,
width attributes from :mod:`.attributes`) -> :mod:`.rebuild`. :mod:`timm_split.core` runs the pipeline."""
