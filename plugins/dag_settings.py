"""How DAG files obtain the lake's ``Settings``: loaded once per parsing process, at parse time.

A DAG file calls ``dag_settings()``; Assets (table URIs) and the spark-submit arguments are
derived from the result, so what the UI shows is what the tasks write. The settings come from
the usual sources (``jzlake.settings.load_settings``): packaged defaults → ``JZLAKE_CONFIG``
→ ``JZLAKE__SECTION__FIELD`` environment overrides.

Workers re-load settings inside each Spark job: the job receives ``--config`` (the same file)
and ``--lake-root`` (the root the Assets point at) explicitly; other ``JZLAKE__*`` overrides
must be set on workers as well as on the DAG processor (one machine: same environment).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from jzlake.settings import Settings, load_settings

CONFIG_ENV = "JZLAKE_CONFIG"


def config_file(environ: Mapping[str, str] | None = None) -> str | None:
    """The YAML file the settings were loaded from (absolute), or ``None`` for the defaults."""
    environ = os.environ if environ is None else environ
    config = environ.get(CONFIG_ENV)
    if not config:
        return None
    path = Path(config).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{CONFIG_ENV}={config} does not name a file; unset it or point it at a YAML file")
    return str(path)


@lru_cache(maxsize=1)
def dag_settings() -> Settings:
    """The settings every DAG of this parsing process uses (cached: parsed once per process)."""
    return load_settings(config_file())
