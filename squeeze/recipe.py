"""A recipe: an ordered list of pass configs, serialisable to YAML/JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from squeeze.errors import SqueezeError
from squeeze.registry import get_pass, pass_for_config
from squeeze.scheme import get_scheme, scheme_from_dict


@dataclass(frozen=True)
class Recipe:
    passes: tuple

    def __post_init__(self) -> None:
        if not self.passes:
            raise SqueezeError("a recipe needs at least one pass")
        for p in self.passes:
            pass_for_config(p)  # raises for objects that are not registered pass configs

    def to_dict(self) -> dict:
        out = []
        for p in self.passes:
            d = asdict(p)
            if d.get("scheme") is not None:  # pruning passes have none
                d["scheme"] = p.scheme.to_dict()
            d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
            out.append({"method": pass_for_config(p).name, **d})
        return {"passes": out}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        passes = []
        for item in d.get("passes", []):
            item = dict(item)
            entry = get_pass(item.pop("method", ""))
            known = {f.name for f in fields(entry.config_cls)}
            extra = set(item) - known
            if extra:
                raise SqueezeError(f"unknown option(s) {sorted(extra)} for method {entry.name!r}; known: {sorted(known)}")
            scheme = item.get("scheme")
            if isinstance(scheme, str):
                item["scheme"] = get_scheme(scheme)
            elif isinstance(scheme, dict):
                item["scheme"] = scheme_from_dict(scheme)
            item = {k: tuple(v) if isinstance(v, list) else v for k, v in item.items()}
            passes.append(entry.config_cls(**item))
        return cls(tuple(passes))

    def dump_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, path: str | Path) -> "Recipe":
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
            raise SqueezeError(f"cannot read recipe {str(path)!r}: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("passes"), list):
            raise SqueezeError(f"recipe {str(path)!r} must be a mapping with a 'passes' list")
        try:
            return cls.from_dict(data)
        except (SqueezeError, TypeError, ValueError, AttributeError) as e:  # say which file holds the mistake
            raise SqueezeError(f"recipe {str(path)!r}: {e}") from None
