"""ComponentRef: how a strategy is named between the request and the loader."""

from __future__ import annotations

import hashlib

import pytest

from shared.messages import ComponentSpec
from shared.strategy import ComponentError, ComponentRef

SOURCE = "from shared.strategy import BaseStrategy\nclass S(BaseStrategy):\n    pass\n"
SHA = hashlib.sha256(SOURCE.encode()).hexdigest()


def test_uploaded_code_travels_by_hash_and_reaches_the_runner_inline() -> None:
    spec = ComponentSpec.model_validate({"source_sha256": SHA, "class": "S", "params": {"n": 1}})
    ref = spec.ref()
    assert ref == ComponentRef(source_sha256=SHA, class_name="S", params={"n": 1})
    with pytest.raises(ComponentError, match="fetch it first"):
        ref.to_json()

    fetched = ref.with_source(SOURCE)
    assert fetched.to_json() == {"source": SOURCE, "class": "S", "params": {"n": 1}}
    assert ComponentRef.from_json(fetched.to_json()) == ComponentRef(
        source=SOURCE, class_name="S", params={"n": 1}
    )


def test_a_builtin_name_is_a_builtin() -> None:
    ref = ComponentRef.from_json("sma_cross")
    assert ref.to_json() == {"builtin": "sma_cross", "params": {}}
    assert ref.label == "builtin 'sma_cross'"
    assert ComponentSpec.model_validate("sma_cross").ref() == ref


def test_code_that_is_not_what_its_hash_names_is_refused() -> None:
    ref = ComponentRef(source_sha256=SHA, class_name="S")
    with pytest.raises(ComponentError, match="the source store returned the wrong file"):
        ref.with_source(SOURCE + "#")
    with pytest.raises(ComponentError, match=f"no uploaded source has sha256 {SHA}"):
        ref.with_source(None)


@pytest.mark.parametrize(
    "fields",
    [{"class_name": "S"}, {"builtin": "a", "module": "b"}, {"builtin": "a", "source": SOURCE}],
)
def test_a_reference_names_exactly_one_component(fields: dict[str, str]) -> None:
    with pytest.raises(ComponentError, match="exactly one of builtin, module or source"):
        ComponentRef(**fields)
