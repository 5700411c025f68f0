"""One test of availability, one message for a language this server cannot run."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bridge import languages
from bridge.errors import InvalidRequest, LanguageUnavailable

PYTHON = languages.resolve("python")


def test_a_language_whose_toolchain_is_missing_is_refused_with_one_message() -> None:
    lacking = replace(PYTHON, name="cobol", toolchain=("cobc-not-installed", "python3"))
    assert not lacking.available and lacking.missing == ("cobc-not-installed",)
    with pytest.raises(LanguageUnavailable) as caught:
        languages.require_available(lacking)
    assert caught.value.message == ("Language 'cobol' is not available on this server "
                                    "(missing cobc-not-installed).")
    assert isinstance(caught.value, InvalidRequest)  # every dialect's 400


def test_an_installed_language_passes_and_is_listed() -> None:
    assert languages.require_available(PYTHON) is PYTHON
    assert PYTHON in languages.available()
    assert all(lang.available for lang in languages.available())
