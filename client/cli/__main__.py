from peftreg.cli.main import main

main()
