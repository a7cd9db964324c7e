from stepwise.main import main

main()
