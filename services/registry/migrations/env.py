from services.common.db import run_alembic_env
from services.registry.storage import metadata

run_alembic_env(metadata)
