//! Enrolment: from a few normal shots to an enrolment the detector applies. [`calibrate`] chooses the
//! automatic thresholds from nuisance views, held-out shots and simulated anomalies ([`synth`]);
//! [`learn`] refines an enrolment from a line's first parts (line mode), [`teach`] from an operator's
//! word that a rejected part is good, and [`versions`] keeps what a camera learned, with its history; [`file`] is the versioned, checksummed enrolment file;
//! [`reference`] turns a file, an image or a folder into an enrolment; [`products`] keeps the products
//! enrolled from the operator station.

pub mod bank;
pub mod calibrate;
pub mod enroll;
pub mod file;
pub mod learn;
pub mod products;
pub mod reference;
pub mod synth;
pub mod teach;
pub mod versions;
