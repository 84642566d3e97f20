"""``etrain credentials create DIR``: a job's CA, agent certificate and token, for every node."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("credentials", help="make a job's credentials (CA, certificate, token)")
    actions = p.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="write a new CA, agent certificate and token")
    create.add_argument("dir", help="a new directory (copy it to every node of the job)")
    create.add_argument("--force", action="store_true", help="replace credentials already there")
    create.set_defaults(run=run_create)


def run_create(args) -> int:
    from elastictrain.credentials import create

    made = create(args.dir, overwrite=args.force)
    print(f"credentials in {made.directory} (CA {made.fingerprint[:12]}): pass "
          f"--credentials {made.directory} to every agent and operator command of the job")
    return 0
