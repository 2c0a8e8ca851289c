"""Alembic environment: runs the service's migrations on a given connection or URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from service.db import VERSION_TABLE, Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(
            connection=connection, target_metadata=target_metadata, version_table=VERSION_TABLE
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        from service.core.config import Settings

        url = Settings().database_url
    with create_engine(url).connect() as conn:
        context.configure(
            connection=conn, target_metadata=target_metadata, version_table=VERSION_TABLE
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
