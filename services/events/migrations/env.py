from services.common.db import run_alembic_env
from services.events.storage import metadata

run_alembic_env(metadata)
