"""The apply stages (a frozen weighting net in ordinary training): ``erm`` and ``oltr`` (extends ``erm``), the
run setup they share (``setup``), the step (``steps``), open-set evaluation (``openset``) and the report."""
