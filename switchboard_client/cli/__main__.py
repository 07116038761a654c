from switchboard_client.cli.main import main

raise SystemExit(main())
