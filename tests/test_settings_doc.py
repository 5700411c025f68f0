"""Every KB_* setting is documented in the README with its default, generated from the model."""

from __future__ import annotations

from api.settings_doc import markdown_table, replace_table
from bridge.settings import Settings

from .support import ROOT


def test_every_setting_has_a_description() -> None:
    missing = [name for name, info in Settings.model_fields.items() if not info.description]
    assert not missing, missing


def test_readme_table_matches_the_model() -> None:
    readme = (ROOT / "README.md").read_text()
    assert replace_table(readme) == readme, "README settings table is stale: make settings-doc"
    for name in Settings.model_fields:
        assert f"| `KB_{name.upper()}` |" in readme, name
    assert "| `KB_DEFAULT_CONCURRENCY` | `5` |" in markdown_table()
