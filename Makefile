.PHONY: run demo test bench lint lock smoke

run:  ## run Kana embedded (SQLite, in-process tasks, demo workspace) on :8000; installs the runtime lock only
	scripts/run.sh

demo:  ## `make run` with sample data: users with duplicates, events (some unmapped), features, a rule
	KANA_DEMO_DATA=1 scripts/run.sh

test:  ## run the test suite (PostgreSQL + Redis when DATABASE_URL/REDIS_URL are set); adds the dev lock
	scripts/test.sh

lint:
	scripts/bootstrap.sh --dev && .venv/bin/ruff check .

lock:  ## re-resolve requirements*.in into the hashed locks requirements*.txt (keeps pins; ARGS=--upgrade)
	scripts/lock.sh $(ARGS)

smoke:  ## the install smokes CI runs after the tests: `make run` + README CLI, then production
	scripts/run_smoke.sh
	scripts/prod_smoke.sh
