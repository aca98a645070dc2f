"""The README documents every setting the CLI accepts (the docs can't silently fall behind)."""

from pathlib import Path

from pool.settings import OPTIONS, env_name

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_flag_and_variable_is_in_the_readme():
    # Given every option the CLI builds flags from
    # When we look for its flag and environment variable in the README's settings table
    missing = [o.name for o in OPTIONS if f"`--{o.name}`" not in README or f"`{env_name(o)}`" not in README]
    # Then none is missing
    assert missing == []


def test_the_readme_names_both_set_up_commands():
    assert "make demo" in README and "make test" in README
