"""The configuration: dataclass schemas in Hydra's ConfigStore (`parallel_schemas` for the
`parallel` group), components located and checked by `_target_`, and composition errors as one
line. The YAML itself is the package `stepwise.conf` (the top-level `conf/` of the checkout).

Layer 2 of 9: may import `contract`.
"""
