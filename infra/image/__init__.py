"""Build and run the trainer image (``infra/docker/Dockerfile``) with Podman, without a registry.

    python -m infra.image.build --base debian          # a local Debian base + this machine's pip configuration
    python -m infra.image.build                        # the published base (python:3.11-slim, needs a registry)

Modules: :mod:`.podman` (the engine's command lines), :mod:`.debian_base` (a Debian root file system made with
``debootstrap`` and imported as an image, cached in Podman's store), :mod:`.pip_config` (this machine's pip
configuration handed to the build through read-only bind mounts, never baked into a layer), :mod:`.build` (the
build itself: labels, cache, timing) and :mod:`.pod` (a rendered Kubernetes pod's container as a ``podman run``).
"""
