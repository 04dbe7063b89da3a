from grpokit.cli import main

if __name__ == "__main__":  # processes started with spawn (vLLM's workers) import the main module again
    raise SystemExit(main())
