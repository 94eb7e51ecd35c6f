from qsmrim.cli.main import main

raise SystemExit(main())
