"""stepwise's config groups: config.yaml and one folder of YAML options per group.

The top-level `conf/` of the checkout, installed as the package `stepwise.conf` (pyproject.toml
maps it, for an editable install and for the wheel), so that `pkg://stepwise.conf` and
`stepwise.config.schemas.CONF_DIR` find it wherever stepwise is installed.
"""
