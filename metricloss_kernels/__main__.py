"""Command line: `python -m metricloss_kernels {demo,backends}`."""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("--help", [])
    if command == "demo":
        from .demo import main as demo
        return demo(rest)
    if command == "backends":
        from . import backends
        for name, (ok, why) in backends().items():
            print(f"{name:10} {'yes' if ok else 'no ':3}  {why}")
        return 0
    print("usage: python -m metricloss_kernels {demo [--loss NAME] [--epochs N], backends}")
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
