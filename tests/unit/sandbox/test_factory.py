"""``new_sandbox``: the one choice of sandbox the services and ``stratorch run`` share."""

from __future__ import annotations

from shared.sandbox import ProcessSandbox
from shared.sandbox.docker import DockerSandbox
from shared.sandbox.factory import new_sandbox
from shared.settings import Settings


def test_the_settings_choose_the_sandbox_and_configure_dockers() -> None:
    settings = Settings(sandbox="docker", sandbox_image="sandbox:mine", sandbox_runtime="runsc")

    docker = new_sandbox(settings)

    assert isinstance(docker, DockerSandbox)
    assert "image='sandbox:mine' runtime='runsc' state=unopened" in repr(docker)
    assert isinstance(new_sandbox(Settings(sandbox="process")), ProcessSandbox)


def test_a_kind_given_overrides_the_settings() -> None:
    # What `stratorch run --sandbox` does.
    assert isinstance(new_sandbox(Settings(sandbox="docker"), "process"), ProcessSandbox)
    assert isinstance(new_sandbox(Settings(sandbox="process"), "docker"), DockerSandbox)
