from tests.distributed.conftest import prepared  # noqa: F401  (shared fixture)
