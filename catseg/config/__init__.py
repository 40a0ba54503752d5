"""catseg's config: every key (keys.py), loading files (loader.py), official files (official.py)."""
from .keys import RELEASES, add_catseg_config, apply_release
from .loader import CONFIG_DIR, load_config, shipped_config

__all__ = ["CONFIG_DIR", "RELEASES", "add_catseg_config", "apply_release", "load_config", "shipped_config"]
