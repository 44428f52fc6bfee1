import Shared

MultiCall.main()
