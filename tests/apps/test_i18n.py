"""One catalogue per language (en, zh): the same keys and fields, every key used by the code
and every key the code uses present; the walkthrough in Chinese with the seed's titles."""

import contextlib
import io
import json
import re
from importlib import resources
from pathlib import Path

import pytest

from attnkit import cli
from attnkit.apps import _i18n, walkthrough

APPS = Path(walkthrough.__file__).parent
ASSETS = APPS / "explore" / "assets"
# The seed tutorial's own section titles (its Chinese text), as the zh walkthrough prints them.
SEED_TITLES = {"3.3.1": "没有可训练权重的简单自注意力机制", "3.4.1": "逐步计算注意力权重",
               "3.5.1": "因果注意力的掩码实现", "3.5.2": "利用 dropout 掩码额外的注意力权重",
               "3.5.3": "实现一个简化的因果注意力类", "3.6.1": "叠加多个单头注意力层",
               "3.6.2": "通过权重划分实现多头注意力"}


def test_every_language_has_the_same_keys_and_fields():
    english = _i18n.catalogue("en")
    for language in _i18n.LANGUAGES:
        texts = _i18n.catalogue(language)
        assert set(texts) == set(english), language
        for key, text in texts.items():
            assert _i18n.fields(text) == _i18n.fields(english[key]), (language, key)
            assert text.strip(), (language, key)


def test_catalogues_are_the_packaged_json_files():
    for language in _i18n.LANGUAGES:
        raw = resources.files("attnkit.apps").joinpath("locale", f"{language}.json")
        assert json.loads(raw.read_text(encoding="utf-8")) == _i18n.catalogue(language)


def _used_keys() -> set[str]:
    code = "".join(p.read_text(encoding="utf-8") for p in sorted(APPS.rglob("*.py")))
    page = "".join((ASSETS / name).read_text(encoding="utf-8")
                   for name in ("index.html", "core.js", "views.js", "models.js", "app.js",
                                "widget.js"))
    used = set(re.findall(r"""["']((?:walkthrough|explore|error)\.[\w.]+)["']""", code + page))
    used |= {f"walkthrough.section.{s}" for s in re.findall(r'section\("([\w.]+)"', code)}
    used |= {f"explore.block.{code}" for code in "sepf"}  # L("explore.block." + b)
    return {key for key in used if not key.endswith(".")}


def test_the_code_uses_exactly_the_catalogue_keys():
    used, known = _used_keys(), set(_i18n.catalogue("en"))
    assert used - known == set(), "used but not in the catalogues"
    assert known - used == set(), "in the catalogues but never used"


def test_translator_fills_fields_and_names_bad_arguments():
    tr = _i18n.translator("zh")
    assert tr("walkthrough.wrote", path="x.png") == "已写入 x.png"
    with pytest.raises(KeyError, match="no text 'nope' in the 'zh' catalogue"):
        tr("nope")
    with pytest.raises(ValueError, match=r"language must be one of \['en', 'zh'\], got 'fr'"):
        _i18n.translator("fr")
    with pytest.raises(TypeError, match="language must be a str, got int"):
        _i18n.catalogue(3)


@pytest.mark.parametrize("environ, language", [
    ({}, "en"), ({"LANG": "zh_CN.UTF-8"}, "zh"), ({"LANG": "en_US.UTF-8"}, "en"),
    ({"LC_ALL": "en_GB.UTF-8", "LANG": "zh_CN.UTF-8"}, "en"),
    ({"LC_MESSAGES": "zh_TW.UTF-8", "LANG": "C"}, "zh"), ({"LANGUAGE": "zh_CN:en"}, "zh"),
    ({"LANG": ""}, "en"),
])
def test_terminal_language(environ, language):
    assert _i18n.terminal_language(environ) == language


def _walkthrough(*argv, env=None, monkeypatch=None):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["walkthrough", "--no-plots", *argv])
    return code, printed.getvalue()


def test_walkthrough_in_chinese_has_the_seed_titles_and_the_same_numbers():
    code_zh, zh = _walkthrough("--lang", "zh")
    code_en, en = _walkthrough("--lang", "en")
    assert code_zh == code_en == 0
    for number, title in SEED_TITLES.items():
        assert f"== {number} {title}" in zh
    assert zh.count("(与教程给出的数值一致)") == len(walkthrough.PUBLISHED)
    assert "注意力" in zh and "matches the published" not in zh
    number = re.compile(r"-?\d+\.\d{4}")
    assert number.findall(zh) == number.findall(en)  # numbers stay as in the code
    for name in ("attn_scores_2", "attn_weights_2_tmp", "masked_simple_norm", "context_vec_2"):
        assert name in zh  # variable names too


def test_walkthrough_language_defaults_to_the_terminal(monkeypatch):
    for name in ("LC_ALL", "LC_MESSAGES", "LANGUAGE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LANG", "zh_CN.UTF-8")
    assert "== 3.6.1 叠加多个单头注意力层 ==" in _walkthrough()[1]
    monkeypatch.setenv("LANG", "en_US.UTF-8")
    assert "== 3.6.1 Stacking multiple single-head attention layers ==" in _walkthrough()[1]


def test_walkthrough_refuses_an_unknown_language(capsys):
    assert cli.main(["walkthrough", "--no-plots", "--lang", "fr"]) == 2
    assert "invalid choice: 'fr'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="language must be one of"):
        walkthrough.run(plots=False, language="fr", stream=io.StringIO())


def test_input_errors_are_worded_by_the_catalogues_in_both_languages():
    from attnkit.apps._i18n import LocalizedError
    from attnkit.apps.translate import dates

    with pytest.raises(LocalizedError) as caught:
        dates.parse_date("2001-3-1")
    assert str(caught.value).startswith("'2001-3-1' is an unsupported format: the translator")
    assert caught.value.text("zh").startswith("'2001-3-1' 是不支持的格式:翻译模型训练时见过 "
                                              "'2001-03-01'")
    assert caught.value.text("fr") == str(caught.value)  # unknown language: English
