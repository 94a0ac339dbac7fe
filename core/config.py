"""Named configurations from configs.yml: `--config NAME` sets an entry point's defaults, flags still override."""
import argparse
from pathlib import Path

import yaml

from core.errors import UserError

CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs.yml"


def bool_flag(s):
    """argparse type for true/false flags written as values, as in the official DINO scripts."""
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")


def load_config(script, name, path=CONFIG_FILE):
    """The section `script` of configs.yml, entry `name`; or a YAML file of flag values given by its path."""
    if name.endswith((".yml", ".yaml")):
        if not Path(name).is_file():
            raise UserError(f"config file {name} does not exist: check the path")
        return yaml.safe_load(Path(name).read_text()) or {}
    configs = (yaml.safe_load(Path(path).read_text()) or {}).get(script, {})
    if name not in configs:
        raise UserError(f"unknown config '{name}' for {script}: choose one of {', '.join(configs) or 'none'} "
                        f"(see configs.yml)")
    return configs[name] or {}


def parse_args(parser, script, argv=None):
    """Parse argv with the defaults of `--config NAME` applied first; unknown keys in a config are an error."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        values = load_config(script, known.config)
        dests = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - dests)
        if unknown:
            raise UserError(f"config '{known.config}' sets unknown options {unknown}: fix configs.yml")
        parser.set_defaults(**values)
    return parser.parse_args(argv)
