"""Common English words from which the built-in speech corpus draws its sentences."""

WORDS = """
a about above across act add after again against age ago air all almost alone along already also always am among
an and animal another answer any appear are area arm around art as ask at away baby back bad ball bank base be
bear beautiful became because become bed been before began begin behind being believe below best better between
big bird black blue board boat body book both box boy bring brother brown build built busy but buy by call came
can car care carry cat cause centre certain chair change child children city class clear close cold colour come
common cook cool corn could country course cover cross cry cut dark day deep did different dinner do doctor does
dog done door down draw dream dress drink drive dry during each early earth east easy eat edge egg end enough even
evening ever every eye face fact fall family far farm fast father feel feet few field fill find fine fire first
fish five floor flower fly follow food foot for forest form found four free friend from front full game garden gave
girl give glass go gold good got grass great green ground group grow had half hand happy hard has have he head hear
heart heavy help her here high hill him his hold home hope horse hot hour house how hundred idea if important in
inside into is island it just keep kind king knew know lady land large last late laugh learn leave left less let
letter life light like line list listen little live long look lost love low made make man many map mark may me mean
measure meet men might mile milk mind minute miss money moon more morning most mother mountain move much music must
my name near need never new next night no north nose not note nothing now number ocean of off office often old on
once one only open or order other our out over own page paper park part pass people perhaps picture piece place
plain plan plant play point poor power pull push put question quick quiet rain ran reach read ready real red remember
rest right river road rock room round run said same sat saw say school sea second see seem sell send sentence set
seven several shall she ship short should show side simple since sing sister sit six sleep slow small snow so some
song soon sound south space speak special spring stand star start stay step still stone stop story street strong
study such summer sun sure table tail take talk tall teacher tell ten than that the their them then there these
they thing think this those though thought three through time to today together told too took top toward town tree
true try turn two under until up upon us use very voice wait walk wall want warm was watch water way we weather
week well went were west what wheel when where which while white who whole why wide will wind window winter wish
with without woman wonder wood word work world would write year yellow yes yet you young your
""".split()
