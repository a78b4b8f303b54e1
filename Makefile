.PHONY: run test bench lint

run:  ## run Kana embedded (SQLite, in-process tasks, demo workspace) on :8000
	scripts/run.sh

test:  ## run the test suite (PostgreSQL + Redis when DATABASE_URL/REDIS_URL are set)
	scripts/test.sh

lint:
	scripts/bootstrap.sh && .venv/bin/ruff check .
