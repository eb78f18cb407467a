from submitd.cli import main

main()
