import pytest

from adapterhub.errors import InvalidNameError
from adapterhub.naming import Policy, broken_rule, check_alias, check_name, parse_ref, suggest_name

VALID = ["sql-lora", "abc", "llama3.2-sql_v2", "a" * 63 + "z", "x1y", "deadbeef", "abcdef12345z"]
INVALID = [
    ("ab", "3–64 characters"),
    ("a" * 65, "3–64 characters"),
    ("SQL-lora", "lowercase"),
    ("sql lora", "lowercase"),
    ("1sql", "starts with a letter"),
    ("-sql", "starts with a letter"),
    ("sql-", "ends with a letter or digit"),
    ("sql--lora", "no two separators"),
    ("sql._lora", "no two separators"),
    ("latest", "reserved"),
    ("base", "reserved"),
    ("all", "reserved"),
    ("none", "reserved"),
    ("abcd\n", "lowercase"),  # `$` matches before a final newline; names are full-matched
    ("deadbeefcafe", "sha256 prefix"),
    ("a" * 64, "sha256 prefix"),
]


@pytest.mark.parametrize("name", VALID)
def test_valid_names_pass(name):
    assert broken_rule(name) is None
    check_name(name)


@pytest.mark.parametrize("name,rule", INVALID)
def test_invalid_names_name_the_rule_and_suggest_a_valid_one(name, rule):
    with pytest.raises(InvalidNameError) as info:
        check_name(name)
    assert rule in info.value.message
    suggestion = info.value.hint.removeprefix("try '").removesuffix("'")
    assert broken_rule(suggestion) is None, suggestion


@pytest.mark.parametrize("raw", ["deadbeefcafe00", "My Adapter!!", "__x__", "9", "", "Ünïcode name", "a--b..c", "all", "z" * 100])
def test_suggestions_are_always_valid(raw):
    assert broken_rule(suggest_name(raw)) is None


def test_suggestion_stays_close_to_the_input():
    assert suggest_name("My SQL Adapter") == "my-sql-adapter"
    assert suggest_name("sql--lora") == "sql-lora"


def test_policy_required_tags_and_pattern():
    policy = Policy(pattern="^{base}-{task}-", required_tags=("task",))
    with pytest.raises(InvalidNameError, match="requires tag"):
        check_name("llama-sql-v1", policy, tags={}, base="llama")
    check_name("llama-sql-v1", policy, tags={"task": "sql"}, base="llama")
    with pytest.raises(InvalidNameError, match="match") as info:
        check_name("sql-v1", policy, tags={"task": "sql"}, base="llama")
    assert info.value.hint == "try 'llama-sql-sql-v1'"
    with pytest.raises(InvalidNameError, match="needs a value for base"):
        check_name("llama-sql-v1", policy, tags={"task": "sql"}, base=None)


def test_policy_extra_reserved_words():
    policy = Policy.from_dict({"reserved_words": ["prod"]})
    with pytest.raises(InvalidNameError, match="reserved"):
        check_name("prod", policy)


def test_refs_parse():
    assert parse_ref("sql-lora").name == "sql-lora"
    assert parse_ref("sql-lora@3").version == 3
    assert parse_ref("sql-lora@prod").alias == "prod"
    assert parse_ref("sql-lora@latest").version is None and parse_ref("sql-lora@latest").alias is None
    sha = parse_ref("ABCDEF0123456789")
    assert sha.sha_prefix == "abcdef0123456789"
    assert parse_ref("abcdef01234").sha_prefix is None  # 11 characters is too short
    with pytest.raises(InvalidNameError):
        parse_ref("@3")


@pytest.mark.parametrize("alias", ["3", "Prod", "latest", "-x", "x-"])
def test_bad_aliases(alias):
    with pytest.raises(InvalidNameError):
        check_alias(alias)


@pytest.mark.parametrize("ref", ["x@0", "x@00", "x@\u00b2", "x@\u0661", "x@" + "9" * 5000])
def test_versions_are_ascii_numbers_from_one(ref, registry, lora_adapter):
    from adapterhub.errors import NotFoundError

    registry.import_adapter(lora_adapter, "x-lora")
    ref = ref.replace("x@", "x-lora@")
    with pytest.raises(NotFoundError, match="no version"):
        registry.resolve(ref)


@pytest.mark.parametrize("alias", ["prod\n", "Prod", "7", "prod-"])
def test_aliases_and_tag_keys_are_full_matched(alias):
    from adapterhub.naming import check_tags

    with pytest.raises(InvalidNameError):
        check_alias(alias)
    with pytest.raises(InvalidNameError):
        check_tags({"key\n": "v"})


def test_required_tag_needs_a_value():
    policy = Policy(required_tags=("task",))
    with pytest.raises(InvalidNameError, match="requires tag"):
        check_name("sql-lora", policy, tags={"task": " "})
    check_name("sql-lora", policy, tags={"task": "sql"})


def test_a_policy_pattern_that_does_not_compile_is_refused_where_read():
    with pytest.raises(InvalidNameError, match="not a valid regular expression"):
        Policy.from_dict({"name_pattern": "^({base}-"})
