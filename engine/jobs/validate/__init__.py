"""The ``validate`` kind: check proxies through a judge and keep the pool's state."""

from engine.jobs.registry import KindInfo, PageInfo

KIND = KindInfo(
    name="validate",
    title="Proxy validation",
    job="engine.jobs.validate.kind:ValidateJob",
    cli="engine.jobs.validate.cli:add_commands",
    page=PageInfo("pages/validation.py", "Validation", ":material/verified:"),
    order=10,
)
