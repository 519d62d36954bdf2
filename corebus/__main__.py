from corebus.cli import main

raise SystemExit(main())
