from corebus.app.cli import main

raise SystemExit(main())
