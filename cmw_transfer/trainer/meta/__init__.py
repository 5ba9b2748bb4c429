"""The meta-gradient algorithms of the meta-train stages: the bi-level meta step (``metastep``) and its dual
forward (``dual_forward``), the weighted objectives (``objectives``), the meta sets (``metasets``) and the advisor
networks (``advisor``). Pure functions and small modules; no stage, no engine."""
